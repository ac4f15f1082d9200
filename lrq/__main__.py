from lrq.cli import entry

entry()
