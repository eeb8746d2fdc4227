"""The commands layer: one module per `overfill` command (`cli.COMMANDS` names them).

Each holds the command's `*Args` dataclass (or takes a library config as it is) and its
`*_command` function, which calls the library and prints what came of it. The library modules
(`train`, `evaluate`, `bench`, `prune`, ...) import nothing from here and print no results:
they return values and paths.
"""
