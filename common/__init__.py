"""What the server and the institutions share: config, adapter arrays, model and data loading.

Never imports ``server`` or ``client``.
"""
