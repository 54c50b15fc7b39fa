"""`edgeflow bench`: the benchmark and its in-process baseline pipeline (`bench`), the
capacity search (`capacity`) and the scale run (`scale`). Installed from a source checkout
beside edgeflow; the serving image leaves it out."""
