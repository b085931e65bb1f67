"""Tools: the ``netlite`` command line and the training plots.

* :mod:`netlite.tools.cli`: the argument parser and :func:`main` (the
  console script);
* :mod:`netlite.tools.commands`: :func:`train`, :func:`test`,
  :func:`time_net` and :func:`device_query`, the work behind ``netlite
  train|test|time|device_query``;
* :mod:`netlite.tools.logs`: Caffe's (glog's) log format, the progress bar
  and the progress records of a log;
* :mod:`netlite.tools.plotting`: the training-loss and test-accuracy plots.

See docs/cli.md.
"""
