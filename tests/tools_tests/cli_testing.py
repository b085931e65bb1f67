"""Helpers shared by the command-line tests (import as ``cli_testing``)."""

import re

#: A glog-formatted line, as netlite's CLI writes them:
#: ``I1201 15:35:44.353423 solver.py:317] message``.
GLOG_LINE = re.compile(r"^[DIWEF]\d{4} \d\d:\d\d:\d\d\.\d{6} [\w.]+:\d+\] ")


def glog_messages(text):
    """The message part of every glog-formatted line of ``text``."""
    out = []
    for line in text.splitlines():
        m = GLOG_LINE.match(line)
        if m:
            out.append(line[m.end():])
    return out
