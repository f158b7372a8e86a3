"""gpuctl.sim"""
