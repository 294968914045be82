from gradlens.cli import main

main()
