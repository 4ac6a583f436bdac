"""Graph passes: canonical views of fx nodes, attention matching into the cascade IR, rewriting."""
