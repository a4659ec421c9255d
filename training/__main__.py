import sys

sys.exit("python -m training: the training module is not built yet; see the issue tracker.")
