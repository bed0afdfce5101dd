"""Pure sinks of results: the `Reporter` protocol, renderers, Markdown, figures, history, TensorBoard."""
