"""gpuctl.store"""
