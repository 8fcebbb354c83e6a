"""Ray Tune: searches (one Tuner per phase), their parameter spaces, per-method ASHA, studies over
seeds and the equal-budget comparison."""
