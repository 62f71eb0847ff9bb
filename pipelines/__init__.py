"""The pipeline graph (installed as `secateurs.pipelines`): `recipe.build_pipeline(config)` and `recipe.place`."""
