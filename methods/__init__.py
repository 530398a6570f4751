"""One package per paper (see each package's README.md): vanilla baselines first."""
