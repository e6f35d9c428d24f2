"""Training of the reference cascade on the procedural world (`runtime.world`): the project's quality fixture, not
part of the product. `python -m training --help`; docs/reference.md says how the committed weights were made."""
