"""The benchmark scripts' shared helpers live in the library (the demo uses
them too): pydecouple.benchmarking. This name is kept for the scripts."""

from pydecouple.benchmarking import (  # noqa: F401
    machine_description,
    machine_header,
    markdown_table,
    median_times,
    write_csv,
)
