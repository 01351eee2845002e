"""One file per method: the whole inference path, top to bottom."""
