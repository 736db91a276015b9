"""The kubectl-style client of the controller's API (docs/cli.md): `kgpu get`, `describe`, `drain`,
`undrain`, `policy` and `rollout`."""
