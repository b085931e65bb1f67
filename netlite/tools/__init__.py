"""Tools: the ``netlite`` command line and the training plots.

* :mod:`netlite.tools.cli`: the argument parser and :func:`main` (the
  console script);
* :mod:`netlite.tools.commands`: :func:`train`, :func:`test` and
  :func:`time_net`, the work behind ``netlite train|test|time``;
* :mod:`netlite.tools.logs`: Caffe's (glog's) log format and the progress
  bar;
* :mod:`netlite.tools.plotting`: the training-loss and test-accuracy plots.

See docs/cli.md.
"""
