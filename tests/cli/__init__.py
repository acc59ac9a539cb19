"""What a user meets first: configs, the README's commands, frictions, the demo, the installed package."""
