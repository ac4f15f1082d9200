"""Run lrq's scheduler: ``nohup python scheduler.py &`` (the same as ``lrq run``)."""
import sys

from lrq.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
