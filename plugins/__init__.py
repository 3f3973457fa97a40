"""Built-in kedit plugins, each registered through the ``kedit`` entry-point group."""
