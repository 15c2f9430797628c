"""vhost-user port types: pyswitch as the virtio-net device back end."""
