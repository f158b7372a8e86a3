"""gpuctl.cli"""
