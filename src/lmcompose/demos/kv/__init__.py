"""Key-value arithmetic (paper §4.1): the task, its training helpers, the pipeline of every row and the report."""
