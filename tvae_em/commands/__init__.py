"""The `tvae-em` commands: one module per command, each a thin click wrapper over the library.

Every module opens with runnable examples and defines one click command; `tvae_em.cli`
registers them. Options shared by several commands are in `tvae_em.commands.options`.
"""
