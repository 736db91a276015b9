"""GPU partitioning on the edge: the cloud's MIG layouts applied after the GPU is drained (and
again after a reboot), time-slicing replicas and their memory shares, and the devices the
device plugin advertises. `plan` and `sharing` are pure; `manager` is the I/O around them."""
