"""``tl-embed serve``: an HTTP service answering search and predict queries from a loaded index and heads."""
