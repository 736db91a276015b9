"""GPU access through pynvml, over the real libnvidia-ml or the simulated one."""
