"""The device layer (edge/devices/base.py) and the non-NVML backends (issue 16)."""
