"""The kgpu edge daemon: one per GPU edge node."""
