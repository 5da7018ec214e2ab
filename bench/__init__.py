"""Speed benchmarks of fimntk against its peers (see ``bench/README.md``)."""
