from replicator.entry import main

main()
