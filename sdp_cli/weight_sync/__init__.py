"""Weight sync: how new weights get from the trainer to the servers."""
