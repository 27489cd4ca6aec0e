from replicator.cli import main

main()
