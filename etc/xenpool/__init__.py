"""xenpool's shipped data: the domain templates, node files and sample configs.

Installed as the package ``xenpool.etc`` (setup.cfg maps it to etc/xenpool), so a
non-editable install finds them with ``importlib.resources.files("xenpool.etc")``.
"""
