from lakesync.cli import main

main()
