"""The federation, transport-free: the server half and the client half of a round, each written once.

The in-process simulator (``sim``) and the Flower transport (``flower``) are loops over these;
neither holds any of a round's logic of its own (architecture.md §2b).
"""
