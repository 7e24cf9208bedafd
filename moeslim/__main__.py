from moeslim.cli import main

main()
