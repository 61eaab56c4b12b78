import SwiftUI

@main
struct HeraldSampleApp: App {
    @UIApplicationDelegateAdaptor(AppDelegate.self) private var appDelegate
    @Environment(\.scenePhase) private var scenePhase

    var body: some Scene {
        WindowGroup {
            ContentView()
                .environmentObject(appDelegate.controller)
        }
        .onChange(of: scenePhase) { phase in
            // Foreground/background → the SDK connects at once / suspends the socket
            // (with the default `suspendInBackground`); APNs covers the background.
            switch phase {
            case .active:
                appDelegate.controller.foreground()
            case .background:
                appDelegate.controller.background()
            default:
                break
            }
        }
    }
}
