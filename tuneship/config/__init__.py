"""The typed stage configs and how a stage's config is read (file, environment, --set).

Empty on purpose: importing the package loads none of its modules."""
