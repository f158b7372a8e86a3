"""gpuctl.node"""
