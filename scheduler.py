"""Run lrq's scheduler: ``nohup python scheduler.py &`` (the same as ``lrq run``)."""
import sys

from lrq.cli import entry

if __name__ == "__main__":
    entry(["run", *sys.argv[1:]])
