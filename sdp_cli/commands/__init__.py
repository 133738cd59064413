"""One module per `sdp` command: what the command does, as named steps. `cli.py` parses the
command line and calls one function here; `signals.py` is how every command stops on a signal."""
