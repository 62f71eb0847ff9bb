"""The pipeline's components (installed as `secateurs.components`): see `steps` for the components and
`runtime` for what their bodies share when they run."""
