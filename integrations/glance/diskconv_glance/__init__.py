"""diskconv for OpenStack Glance: the `diskconv_conversion` image-import plugin."""
