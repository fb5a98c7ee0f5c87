from memattn.cli import main

main()
