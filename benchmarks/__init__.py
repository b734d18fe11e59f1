"""editkit's benchmarks (``make bench``): ``run.py`` drives them; each lives in a file of its name."""
