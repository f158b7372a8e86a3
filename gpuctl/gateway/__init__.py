"""gpuctl.gateway"""
