"""A hospital's own Flower app, made private and secure with bract."""
