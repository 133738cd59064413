"""vLLM servers: command line, process groups, health, supervision, registry file."""
