"""gpuctl.cloud"""
