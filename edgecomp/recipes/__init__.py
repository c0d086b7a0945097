"""Recipe builders. Each module offers `build(recipe) -> torch.nn.Module` and
`samples(recipe) -> SampleSet` (real calibration and validation inputs)."""
