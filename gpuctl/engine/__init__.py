"""gpuctl.engine"""
