"""What each ``mmbalance`` command does, one module per command.

``cli.py`` only parses arguments and calls these functions with typed arguments, so a command
can be called from Python (the demo calls ``compare``; tests call them directly) without
building an ``argparse.Namespace``. Each function validates its whole input before anything is
read or written, and raises the expected errors (``errors.py``) that the CLI turns into one
message and exit status 2.
"""
